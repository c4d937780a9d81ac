"""`python -m vtbench ARGS` is `vt ARGS` (what `torchrun ... -m vtbench extract ...` runs)."""

from vtbench.cli import main

if __name__ == "__main__":
    main()
