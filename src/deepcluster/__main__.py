import sys

from deepcluster.cli import main

sys.exit(main())
