"""Store access: the etcd key layout (keys.py), the etcd client (etcd.py) and a watched cache (view.py)."""
