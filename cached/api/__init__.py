"""HTTP surfaces of a node: the local control API (``local``) and its client (``client``)."""
