// The launcher: `emu KERNEL GX GY BLOCK SMEM ARG...`, where an ARG is `buf:PATH` (the file is
// loaded, its address passed, and the memory written back to the file after the launch),
// `i:N`, `f:X` (any float or double parameter) or `null`. Parameter types come from the kernel's
// own signature, so the registry (generated next to this file) only lists names.

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

struct Arg {
    void* ptr = nullptr;
    long long i = 0;
    double f = 0;
};

template <class T>
T emu_conv(const Arg& a) {
    if constexpr (std::is_pointer_v<T>) return reinterpret_cast<T>(a.ptr);
    else if constexpr (std::is_floating_point_v<T>) return (T)a.f;
    else return (T)a.i;
}

template <class... A, size_t... I>
void emu_invoke(void (*f)(A...), const std::vector<Arg>& v, std::index_sequence<I...>) {
    f(emu_conv<A>(v[I])...);
}

template <class... A>
std::function<void(const std::vector<Arg>&)> emu_kernel(void (*f)(A...)) {
    return [f](const std::vector<Arg>& v) {
        if (v.size() != sizeof...(A)) {
            std::fprintf(stderr, "kernel takes %zu arguments, got %zu\n", sizeof...(A), v.size());
            std::exit(2);
        }
        emu_invoke(f, v, std::index_sequence_for<A...>{});
    };
}

std::map<std::string, std::function<void(const std::vector<Arg>&)>> emu_registry();

int main(int argc, char** argv) {
    if (argc < 6) {
        std::fprintf(stderr, "usage: emu KERNEL GX GY BLOCK SMEM ARG...\n");
        return 2;
    }
    auto reg = emu_registry();
    auto it = reg.find(argv[1]);
    if (it == reg.end()) {
        std::fprintf(stderr, "no kernel %s\n", argv[1]);
        return 2;
    }
    gridDim.x = std::atoi(argv[2]);
    gridDim.y = std::atoi(argv[3]);
    blockDim.x = std::atoi(argv[4]);
    emu_dyn_smem.assign(std::atoi(argv[5]), 0);
    std::vector<Arg> args;
    std::vector<std::pair<std::string, std::vector<unsigned char>>> bufs;
    bufs.reserve(argc);
    for (int a = 6; a < argc; a++) {
        std::string s = argv[a];
        Arg arg;
        if (s.rfind("buf:", 0) == 0) {
            std::string path = s.substr(4);
            FILE* fp = std::fopen(path.c_str(), "rb");
            if (!fp) { std::perror(path.c_str()); return 2; }
            std::vector<unsigned char> data;
            unsigned char chunk[65536];
            size_t n;
            while ((n = std::fread(chunk, 1, sizeof chunk, fp)) > 0) data.insert(data.end(), chunk, chunk + n);
            std::fclose(fp);
            // Room past the end, so that a kernel reading a vector past a buffer's end reads
            // zeros here rather than crashing before the check below can name it.
            data.resize(data.size() + 64, 0);
            bufs.emplace_back(path, std::move(data));
            arg.ptr = bufs.back().second.data();
        } else if (s.rfind("i:", 0) == 0) {
            arg.i = std::atoll(s.c_str() + 2);
        } else if (s.rfind("f:", 0) == 0) {
            arg.f = std::atof(s.c_str() + 2);
        } else if (s != "null") {
            std::fprintf(stderr, "bad argument %s\n", s.c_str());
            return 2;
        }
        args.push_back(arg);
    }
    unsigned nt = blockDim.x;
    std::barrier<> block_barrier(nt);
    emu_block_barrier = &block_barrier;
    for (unsigned w = 0; w < (nt + 31) / 32; w++) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    emu_warp_slots.assign(((nt + 31) / 32) * 32, 0);
    auto& kernel = it->second;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; t++) {
        threads.emplace_back([&, t] {
            threadIdx.x = t;
            for (unsigned by = 0; by < gridDim.y; by++) {
                for (unsigned bx = 0; bx < gridDim.x; bx++) {
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    kernel(args);
                    block_barrier.arrive_and_wait();
                }
            }
        });
    }
    for (auto& th : threads) th.join();
    for (auto& [path, data] : bufs) {
        for (size_t k = data.size() - 64; k < data.size(); k++) {
            if (data[k] != 0) {
                std::fprintf(stderr, "kernel wrote past the end of %s\n", path.c_str());
                return 3;
            }
        }
        FILE* fp = std::fopen(path.c_str(), "wb");
        std::fwrite(data.data(), 1, data.size() - 64, fp);
        std::fclose(fp);
    }
    return 0;
}
