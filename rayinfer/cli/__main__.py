import sys

from rayinfer.cli import main

sys.exit(main())
