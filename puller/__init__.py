"""The runtime pod: registers in etcd, pulls and loads assigned models, serves V2 inference."""
