"""``python -m cached`` runs the daemon."""

from cached.daemon import main

main()
