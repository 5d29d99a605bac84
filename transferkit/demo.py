"""`make demo` until the training engine lands: inspect two backbones offline."""

from transferkit.cli import main

if __name__ == "__main__":
    main(["inspect", "timm:resnet18", "--freeze", "up_to:layer2"])
    main(["inspect", "torchvision:efficientnet_b0", "--freeze", "all@norm=stats_frozen"])
