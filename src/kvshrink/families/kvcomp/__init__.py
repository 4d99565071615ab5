"""KVComp: error-bounded quantization + Huffman coding, decoded inside attention."""
