"""What lorakit writes, reads and shows: atomic files, JSON and safetensors (never pickles), the console, plots."""
