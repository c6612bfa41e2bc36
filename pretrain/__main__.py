"""`torchrun --nproc_per_node N -m pretrain [--config] CONFIG [section.field=value ...]`.

The `if __name__ == "__main__"` guard matters: megatron-core's checkpoint writers
start spawn-mode processes that re-import the entry module.
"""

import sys

from mesh_cli.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--config"]:  # accept both `--config X` and a positional X
        args = args[1:]
    elif args and args[0].startswith("--config="):
        args = [args[0].split("=", 1)[1], *args[1:]]
    sys.exit(main(["train", *args]))
