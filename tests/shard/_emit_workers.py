def graph_parity_worker(rank, world):
    from tests.compiler._workers import parity_worker

    return {
        "v2_train": parity_worker(rank, world, 2, 7, True, emit="graph"),
        "v1_eval": parity_worker(rank, world, 1, 7, False, emit="graph"),
        "af3like": parity_worker(rank, world, 2, 7, False, kind="af3like", emit="graph"),
    }
