"""`torchrun --nproc_per_node N -m pretrain CONFIG [section.field=value ...]`.

The `if __name__ == "__main__"` guard matters: megatron-core's checkpoint writers
start spawn-mode processes that re-import the entry module.
"""

import sys

from mesh_cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
