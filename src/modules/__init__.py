"""Lightning modules, one per kind of batch: ``lm`` (causal LM: copy, images, text), ``seq2seq``, ``ctc``.

Each is a thin subclass of ``BaseModule`` (optimizer and schedule from plain config, NaN guard, seeding, metrics) and
names the ``batch_kind`` it consumes; a task's datamodule names the kind it produces, and ``attnlab.train`` refuses a
pair that does not match before anything is built."""
