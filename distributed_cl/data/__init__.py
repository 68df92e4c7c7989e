"""Data: the built-in datasets and your own files (formats.py, decoded by Ray Data), as decoded
`Table`s; two-view augmentations. Nothing is imported here, so that Ray Data's decode tasks,
which import formats.py, stay free of torch."""
