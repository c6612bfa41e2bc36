import sys

from mesh_cli.main import main

sys.exit(main())
