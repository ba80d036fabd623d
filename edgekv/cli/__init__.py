"""The top floor: the `edgekv` command line and the terminal chat loop."""
