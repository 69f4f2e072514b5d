from mnist_pipeline.cli import script

script()
