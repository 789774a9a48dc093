"""What the study trains: datasets (offline digits, Imagenette, ImageFolder, fake), byte-level
text (the standard library's sources by default), torchvision classifiers and the GPT."""
