"""The `mesh` command: run the mesh locally, run one process, and talk to a running router."""
