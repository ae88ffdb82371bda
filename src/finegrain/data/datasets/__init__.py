"""One reader per published on-disk layout."""
