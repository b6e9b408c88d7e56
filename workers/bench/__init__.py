"""Benchmarks (`cmacc bench ...`; docs/performance.md): each measures on the machine it runs
on and returns a JSON-able report; the commands print it as a table.

* `sampler`: milliseconds per dictionary selection;
* `train`: the plain training step against the whole service path, side by side;
* `reader`: clips per second of the shard reader.
"""
