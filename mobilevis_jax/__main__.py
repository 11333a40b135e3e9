import sys

from mobilevis_jax.cli import main

sys.exit(main())
