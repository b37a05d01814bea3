"""Complete examples of reading a run without pfedmoap (h5py, numpy, pandas), shipped with the
package so that an installed wheel has them:

    python -m pfedmoap.examples.load_run_h5py RUN_DIR          # attributes, accuracy per round
    python -m pfedmoap.examples.load_run_pandas RUN_DIR        # a long round x client DataFrame

Each file is a standalone script (it imports neither pfedmoap nor this package) to copy and adapt;
`python -c "import pfedmoap.examples as e; print(e.__path__[0])"` says where they are.
"""
