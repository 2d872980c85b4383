import sys

from olss_fast.cli import main

sys.exit(main())
