"""The protocol package's one exception root."""


class ProtocolError(Exception):
    """Base of every error the protocol package raises: a refused envelope, a bad key file, a
    server that refused a request or could not be reached."""
