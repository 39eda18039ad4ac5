"""One module per DVC stage, each runnable as `python -m stages.<name>`; each is a thin shell over `rmpipe`."""
