import sys

from lmkern.cli import main

sys.exit(main())
