"""``python -m healthfm`` (also what torchrun runs with ``-m healthfm``)."""

from healthfm.cli import main

raise SystemExit(main())
