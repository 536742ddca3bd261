import sys

from pyprivsep.cli import main

sys.exit(main())
