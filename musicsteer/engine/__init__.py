"""The model and the stream: the lean MusicGen decoder, its caches, sampling, the
delay pattern, text conditioning, the codec and loading."""
