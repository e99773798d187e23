import sys

from lean.cli import main

sys.exit(main())
