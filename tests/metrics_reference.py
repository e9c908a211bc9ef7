"""The community metrics on random weights, run in the reference environment (torch 2.14.1,
torchvision 0.29.1, lpips 0.1.4, pytorch-fid 0.3.0; `.ci/run` builds it as .venv-ref), called by
tests/test_metric_nets.py as `python tests/metrics_reference.py DIR`.

DIR holds images.npy (N, H, W, 3) uint8 and pairs.npy (N, H, W, 3) uint8. This writes, into DIR,
the weight files in the community layouts (torchvision's alexnet-owt-7be5be79.pth, lpips' v0.1
alex.pth, pytorch-fid's pt_inception-2015-12-05-6726825d.pth), each loaded by its package through
its own code path, and reference.npz: lpips(images, pairs), the Inception pool features of both
sets, and pytorch-fid's Frechet distance between them.
"""

import os
import sys

import numpy as np
import torch


def randomize(model, seed):
    """He-scaled convolutions, random biases, BatchNorm with random affine and running
    statistics, so that every tensor shows in the output and activations stay O(1) (also the
    random metric weights of tests/test_eval.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.ndim > 1:
                t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                base = 1.0 if name.endswith("bn.weight") else 0.0
                t.copy_(base + 0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def main(folder):
    import lpips  # the reference packages: only in the reference environment
    import pytorch_fid.inception as inception
    import torchvision
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = (np.load(os.path.join(folder, f"{n}.npy")) for n in ("images", "pairs"))
    ta, tb = (torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255 for v in (a, b))

    # LPIPS: torchvision's AlexNet file -> lpips' slices; lpips' own loader reads alex.pth.
    alexnet = randomize(torchvision.models.alexnet(weights=None), 1)
    torch.save(alexnet.state_dict(), os.path.join(folder, "alexnet-owt-7be5be79.pth"))
    lin = randomize(lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True), 2)
    lin_state = {k: v for k, v in lin.state_dict().items() if k.startswith("lin")}
    torch.save(lin_state, os.path.join(folder, "alex.pth"))
    net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True,
                      model_path=os.path.join(folder, "alex.pth")).eval()
    for i, layer in enumerate(alexnet.features):  # lpips' slice k holds features[i] as "i"
        for s in range(1, 6):
            slice_ = getattr(net.net, f"slice{s}")
            if str(i) in slice_._modules:
                slice_._modules[str(i)].load_state_dict(layer.state_dict())
    with torch.no_grad():
        d = net(2 * ta - 1, 2 * tb - 1).flatten().numpy()

    # FID Inception: build pytorch-fid's network once to get its tensors, randomise and save
    # them as the weight file, then let pytorch-fid build and load it the normal way (strict).
    path = os.path.join(folder, "pt_inception-2015-12-05-6726825d.pth")
    inception.load_state_dict_from_url = lambda *args, **kw: {}
    real_load = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, *args, **kw: None
    shape = randomize(inception.fid_inception_v3(), 3)
    torch.nn.Module.load_state_dict = real_load
    torch.save(shape.state_dict(), path)
    inception.load_state_dict_from_url = lambda *args, **kw: torch.load(path, weights_only=True)
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        fa, fb = (model(t)[0].flatten(1).double().numpy() for t in (ta, tb))
    fid = calculate_frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0),
                                     np.cov(fb, rowvar=False))
    np.savez(os.path.join(folder, "reference.npz"), lpips=d, features_a=fa, features_b=fb,
             fid=fid, versions=np.array([torch.__version__, torchvision.__version__]))


if __name__ == "__main__":
    main(sys.argv[1])
