import sys

from mypt.cli import main

sys.exit(main())
