"""The router: stateless KServe V2 front door and registration API of the mesh."""
