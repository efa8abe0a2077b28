import sys

from megatron_apriel.cli import main

sys.exit(main())
