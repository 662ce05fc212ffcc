"""Exit status of the command-line tools (``engine.pretrain``, ``engine.eval``, ``engine.export``,
``engine.visualize``), distinct per cause so that a scheduler script can tell them apart.

==  ==========================================================================================================
0   success
1   internal error: an unexpected exception (a bug: the traceback is printed; please report it)
2   bad arguments or configuration (unknown key, wrong type or range, an output folder that holds another run)
3   training stopped on non-finite values (NaN/Inf loss, gradient norm or parameters); the message names the
    last finite checkpoint
4   data error: the data folder cannot be read or holds no usable images
5   checkpoint error: a checkpoint is unreadable, corrupted, non-finite or of another run
6   distributed failure: a peer rank stopped answering within ``--dist-timeout``
75  pre-empted (SIGTERM/SIGINT): a checkpoint was saved at the step boundary; continue with ``--resume``
==  ==========================================================================================================
"""

OK = 0
INTERNAL = 1
USAGE = 2
NON_FINITE = 3
DATA = 4
CHECKPOINT = 5
DISTRIBUTED = 6
PREEMPTED = 75
