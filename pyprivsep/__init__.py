"""pyprivsep: a TLS relay whose private keys live only in ca processes."""

__version__ = "0.1.0"
