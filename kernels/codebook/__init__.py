"""VQ-KD codebook ops: fused nearest-code lookup, norm-EMA update, k-means init, usage stats, VectorQuantizer.

One module per op, named as the op (``nearest_code.py`` with its kernels in ``nearest_code_triton.py``,
``ema_codebook_update.py`` with ``ema_codebook_update_triton.py``; the plain-PyTorch helpers
``kmeans_init_codebook.py``, ``codebook_usage.py``, ``commitment_loss.py``; ``VectorQuantizer`` in
``modules.py``; the family's oracle in ``reference.py``). The functions are imported from ``kernels``
(``from kernels import nearest_code``); this package does not re-export them, so that
``kernels.codebook.nearest_code`` always names the module.
"""

from kernels.codebook.modules import VectorQuantizer
from kernels.codebook.nearest_code import NearestCode, NearestCodeFunction

__all__ = ["NearestCode", "NearestCodeFunction", "VectorQuantizer"]
