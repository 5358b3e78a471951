"""Fashion Tagger: nightly batch tagging of retail catalogs from product images."""

__version__ = "0.1.0"
