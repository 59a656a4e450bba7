import sys

from amp_lib.sweep.cli import main

sys.exit(main())
