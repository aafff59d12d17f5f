import sys

from moeq.cli import main

sys.exit(main())
