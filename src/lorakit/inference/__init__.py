"""Using a fine-tuned adapter: generating text with it, and exporting the merged model."""
