"""External corpus: AF3-like codebases the project did not write, compiled unmodified.

Each harness module (``alphafold3_pytorch``, ``protenix``, ``openfold3``) exposes
``build(seed, n=7)`` and ``build_wrapped(seed, n=7)`` returning ``(model, example_inputs,
description)`` with ``example_inputs = (args, kwargs)`` exactly as the codebase's own
top-level model calls the stack.  Install the corpus with ``bash scripts/install_corpus.sh``.
"""
