"""RQ-VAE (as in TIGER): MLP encoder -> residual quantisation with `levels` codebooks -> MLP decoder.

Straight-through estimator, codebook + commitment losses, codebooks initialised by residual k-means on
the first batch's latents, unused codes re-initialised to random residuals after each epoch.
Deterministic for a seed (runs single-threaded on CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.tokenizer.rq_kmeans import rq_kmeans


class RQVAE(nn.Module):
    def __init__(self, dim: int, levels: int, codebook_size: int, hidden_dim: int = 256, latent_dim: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.randn(codebook_size, latent_dim) * 0.1) for _ in range(levels)]
        )

    def quantise(self, z: torch.Tensor):
        """(quantised z, codes [b, L], residual entering each level [L, b, latent], codebook+commit loss terms)."""
        residual, zq = z, torch.zeros_like(z)
        codes, residuals, cb_loss, commit = [], [], z.new_zeros(()), z.new_zeros(())
        for book in self.codebooks:
            residuals.append(residual)
            code = torch.cdist(residual.detach(), book.detach()).argmin(dim=1)
            e = book[code]
            cb_loss = cb_loss + ((residual.detach() - e) ** 2).sum(-1).mean()
            commit = commit + ((residual - e.detach()) ** 2).sum(-1).mean()
            zq = zq + e
            residual = residual - e.detach()
            codes.append(code)
        return zq, torch.stack(codes, 1), torch.stack(residuals), cb_loss, commit

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        zq, codes, residuals, cb_loss, commit = self.quantise(z)
        zq = z + (zq - z).detach()  # straight-through
        return self.decoder(zq), codes, residuals, cb_loss, commit


def rq_vae(
    x: np.ndarray,
    levels: int = 3,
    codebook_size: int = 256,
    epochs: int = 100,
    seed: int = 0,
    batch_size: int = 1024,
    lr: float = 1e-3,
    beta: float = 0.25,
    hidden_dim: int = 256,
    latent_dim: int = 64,
    show_progress: bool = True,
    history: list | None = None,
) -> np.ndarray:
    """Train an RQ-VAE on x [n, d] and return each row's codes [n, levels] int64.

    `history`, when given, receives one dict of mean losses per epoch.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise PadrecError(f"rq_vae expects a non-empty [n, d] matrix, got shape {x.shape}")
    if levels < 1 or codebook_size < 1 or epochs < 0:
        raise PadrecError("rq_vae needs levels >= 1, codebook_size >= 1, epochs >= 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        data = torch.from_numpy(x)
        n = data.shape[0]
        model = RQVAE(x.shape[1], levels, codebook_size, hidden_dim, latent_dim)
        _init_codebooks(model, data[torch.randperm(n, generator=gen)[:batch_size]], seed, gen)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        bar = tqdm(range(epochs), desc="rq-vae", disable=not show_progress, leave=False)
        for epoch in bar:
            model.train()
            used = torch.zeros(levels, codebook_size, dtype=torch.bool)
            sums = np.zeros(3)
            last_res = None
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                batch = data[idx]
                recon, codes, residuals, cb_loss, commit = model(batch)
                rec = ((recon - batch) ** 2).sum(-1).mean()
                loss = rec + cb_loss + beta * commit
                opt.zero_grad()
                loss.backward()
                opt.step()
                for level in range(levels):
                    used[level, codes[:, level]] = True
                sums += [rec.item() * len(idx), cb_loss.item() * len(idx), commit.item() * len(idx)]
                last_res = residuals.detach()
            stats = dict(zip(("recon", "codebook", "commit"), (sums / n).round(5).tolist()))
            stats["dead_codes"] = int((~used).sum())
            if history is not None:
                history.append({"epoch": epoch, **stats})
            bar.set_postfix(recon=stats["recon"], dead=stats["dead_codes"])
            if epoch < epochs - 1:
                _reinit_dead(model, used, last_res, gen)
        model.eval()
        with torch.no_grad():
            codes = torch.cat([model.quantise(model.encoder(b))[1] for b in data.split(4096)])
        return codes.numpy().astype(np.int64)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _init_codebooks(model: RQVAE, batch: torch.Tensor, seed: int, gen: torch.Generator) -> None:
    """Residual k-means on the first batch's latents; levels with fewer clusters than codes are padded
    with random residuals plus a little noise."""
    z = model.encoder(batch).numpy()
    size = model.codebooks[0].shape[0]
    codes, books = rq_kmeans(z, levels=len(model.codebooks), codebook_size=size, seed=seed, niter=10)
    residual = torch.from_numpy(z)
    for level, (param, book) in enumerate(zip(model.codebooks, books)):
        book = torch.from_numpy(book)
        if book.shape[0] < size:
            pick = torch.randint(0, residual.shape[0], (size - book.shape[0],), generator=gen)
            noise = torch.randn(len(pick), residual.shape[1], generator=gen) * 1e-3
            book = torch.cat([book, residual[pick] + noise])
        param.copy_(book)
        residual = residual - book[torch.from_numpy(codes[:, level])]


@torch.no_grad()
def _reinit_dead(model: RQVAE, used: torch.Tensor, residuals: torch.Tensor, gen: torch.Generator) -> None:
    """Move each code not chosen during the epoch onto a random residual (at its level) of the last batch."""
    for level, param in enumerate(model.codebooks):
        dead = (~used[level]).nonzero().flatten()
        if dead.numel():
            pick = torch.randint(0, residuals.shape[1], (dead.numel(),), generator=gen)
            param[dead] = residuals[level, pick]
