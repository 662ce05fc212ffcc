"""Layer shapes shared by the bench, the static GPU check and the real-shape GPU tests (one table, one place)."""

# SparK's sparse convolutions at the ResNet-50 / ConvNeXt-B layer shapes.
# name: (Cin, Cout, kernel, stride, depthwise, stride of the layer's input w.r.t. the image)
SPARK_CONV_LAYERS = {
    "rn50_stem_7x7s2": (3, 64, 7, 2, False, 1),
    "rn50_l1_3x3": (64, 64, 3, 1, False, 4),
    "rn50_l1_1x1": (256, 64, 1, 1, False, 4),
    "rn50_l2_3x3s2": (128, 128, 3, 2, False, 4),
    "rn50_l3_3x3": (256, 256, 3, 1, False, 16),
    "rn50_l4_3x3": (512, 512, 3, 1, False, 32),
    "cnxb_dw7_s1": (128, 128, 7, 1, True, 4),
    "cnxb_dw7_s3": (512, 512, 7, 1, True, 16),
}
