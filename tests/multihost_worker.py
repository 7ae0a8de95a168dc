"""One process of a ``tests/test_multihost.py`` run: ``rre-train`` as a user starts it, plus a record of the
prompt rows this process fed to its steps (``PromptIterator`` batches), written to the JSON file ``argv[1]``.

    python tests/multihost_worker.py RECORD.json --workdir=... --config=... --config.distributed.initialize=True ...
"""
import json
import sys


def main() -> None:
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a stuck process is
    record, argv = sys.argv[1], sys.argv[2:]
    from rre_jax.data import batching
    seen = []
    next_batch = batching.PromptIterator.__next__

    def spy(self):
        batch = next_batch(self)
        seen.append(batch.index_B.tolist())
        return batch

    batching.PromptIterator.__next__ = spy
    from rre_jax.cli import train as cli
    sys.argv = ["rre-train"] + argv
    try:
        cli.run()
    finally:
        import jax
        with open(record, "w") as f:
            json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                       "local_devices": jax.local_device_count(), "batches": seen}, f)


if __name__ == "__main__":
    main()
