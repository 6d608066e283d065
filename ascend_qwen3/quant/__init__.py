"""W8A8 quantization: the msModelSlim checkpoint format, int8 layers and the quantizer."""
