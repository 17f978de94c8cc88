"""meshserve's shared kernel: types, etcd key layout and store access, errors, settings, metrics.

No server lives here; router/, placement/ and puller/ build on it.
"""
