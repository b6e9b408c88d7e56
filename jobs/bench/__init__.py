"""The benchmarks behind `cmacc bench`, as a job: `python -m jobs.bench train|reader|sampler`.

* `cli`: their arguments, defined and checked torch-free (the command line shares them);
* `train`: the train benchmark's work, the plain step against a real pretraining job;
* `reader`: the reader benchmark's work, clips per second of the shard reader.

The sampler benchmark's work is `workers.bench.sampler`.
"""
