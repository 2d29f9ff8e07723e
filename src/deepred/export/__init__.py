"""Export: a merged model to GGUF (convert.py, with llama.cpp's converter and quantiser) and the proof that the file
is that model (check.py); source.py checks the model folder both start from. The table of GGUF types is
deepred.quant_types; opening a GGUF with llama.cpp is deepred.llama_runtime."""
