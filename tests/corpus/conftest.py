def pytest_configure(config):
    config.addinivalue_line(
        "markers", "corpus: external AF3-like codebases compiled unmodified (needs bash scripts/install_corpus.sh)")
