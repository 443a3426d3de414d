"""Client training engines beyond the sequential one (:mod:`lorafleet.runtimes.session`).

:mod:`lorafleet.engine.batched` trains a round's clients in groups, one forward and backward
per step for many adapters (``train.client_batching``); :mod:`lorafleet.engine.rows` is the
per-row LoRA layer it needs and :mod:`lorafleet.engine.randomness` keeps each client's
dropout masks its own.
"""
