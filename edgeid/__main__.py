import sys

from edgeid.cli import main

sys.exit(main())
