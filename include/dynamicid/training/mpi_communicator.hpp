// dynamicid training: the MPI model of the communicator concept.
//
// Optional add-on: include it and link the CMake target dynamicid::mpi
// (find_package(MPI)). Buffers are host memory; reductions are started with
// MPI_Iallreduce so that a gradient_bucketer overlaps them with the backward.
// MPI errors come back as communication_error (the communicator works on its
// own duplicate of the given MPI communicator, with MPI_ERRORS_RETURN set),
// never as an abort from the library's side.
#pragma once

#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/training/communicator.hpp>

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

namespace dynamicid::training {

namespace detail {

inline void check_mpi(int code, const char* what) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING] = {};
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
    throw communication_error("mpi", std::string(what) + " failed: " + std::string(text, static_cast<std::size_t>(length)));
}

template <class T>
inline constexpr bool mpi_element = std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, std::byte>;

template <class T>
MPI_Datatype mpi_type() {
    if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
    else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
    else return MPI_BYTE;
}

inline int mpi_count(std::size_t n) {
    if (n > static_cast<std::size_t>(INT_MAX))
        throw communication_error("mpi", "buffer of " + std::to_string(n) + " elements exceeds MPI's int count; use smaller buckets");
    return static_cast<int>(n);
}

}  // namespace detail

/// Initialises MPI for the lifetime of the object (if it is not initialised
/// yet) and finalises it at the end. For programs; a library embedding
/// dynamicid in an MPI application simply skips it.
///
///     int main(int argc, char** argv) {
///         dynamicid::training::mpi_environment mpi(argc, argv);
///         dynamicid::training::mpi_communicator comm;   // MPI_COMM_WORLD
///         ...
///     }
class mpi_environment {
public:
    mpi_environment(int& argc, char**& argv) {
        int initialised = 0;
        detail::check_mpi(MPI_Initialized(&initialised), "MPI_Initialized");
        if (!initialised) {
            int provided = 0;
            detail::check_mpi(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
            owns_ = true;
        }
    }
    mpi_environment(const mpi_environment&) = delete;
    mpi_environment& operator=(const mpi_environment&) = delete;
    ~mpi_environment() {
        int finalised = 1;
        if (owns_ && MPI_Finalized(&finalised) == MPI_SUCCESS && !finalised) MPI_Finalize();
    }

private:
    bool owns_ = false;
};

/// A communicator over the processes of an MPI communicator (f32, f64, bytes).
///
///     training::mpi_communicator comm;                        // a duplicate of MPI_COMM_WORLD
///     training::allreduce_average(ctx, comm, grad);           // tensor helper
///     auto r = comm.start_allreduce_sum(std::span(buffer));   // non-blocking
///     comm.wait(r);
class mpi_communicator {
public:
    /// A started reduction.
    struct request {
        MPI_Request handle = MPI_REQUEST_NULL;
    };
    static constexpr memory_space memory = memory_space::host;

    explicit mpi_communicator(MPI_Comm parent = MPI_COMM_WORLD) {
        int initialised = 0;
        detail::check_mpi(MPI_Initialized(&initialised), "MPI_Initialized");
        if (!initialised) throw communication_error("mpi", "MPI is not initialised (call MPI_Init, or create an mpi_environment)");
        detail::check_mpi(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
        detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
        detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
        detail::check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    }
    mpi_communicator(const mpi_communicator&) = delete;
    mpi_communicator& operator=(const mpi_communicator&) = delete;
    mpi_communicator(mpi_communicator&& other) noexcept
        : comm_(std::exchange(other.comm_, MPI_COMM_NULL)), rank_(other.rank_), size_(other.size_) {}
    mpi_communicator& operator=(mpi_communicator&& other) noexcept {
        if (this != &other) {
            release();
            comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
            rank_ = other.rank_;
            size_ = other.size_;
        }
        return *this;
    }
    ~mpi_communicator() { release(); }

    int rank() const noexcept { return rank_; }
    int size() const noexcept { return size_; }
    /// The duplicated MPI communicator, for calls this class does not wrap.
    MPI_Comm native() const noexcept { return comm_; }

    template <class T>
        requires detail::mpi_element<T>
    request start_allreduce_sum(std::span<T> values) {
        request r;
        detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, values.data(), detail::mpi_count(values.size()), detail::mpi_type<T>(),
                                         MPI_SUM, comm_, &r.handle),
                          "MPI_Iallreduce");
        return r;
    }

    void wait(request& r) {
        if (r.handle == MPI_REQUEST_NULL) return;
        detail::check_mpi(MPI_Wait(&r.handle, MPI_STATUS_IGNORE), "MPI_Wait");
    }

    template <class T>
        requires detail::mpi_element<T>
    void allreduce_sum(std::span<T> values) {
        detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, values.data(), detail::mpi_count(values.size()), detail::mpi_type<T>(),
                                        MPI_SUM, comm_),
                          "MPI_Allreduce");
    }

    template <class T>
        requires detail::mpi_element<T>
    void broadcast(std::span<T> values, int root) {
        check(root >= 0 && root < size_, "mpi", "broadcast root ", root, " out of range for ", size_, " processes");
        detail::check_mpi(MPI_Bcast(values.data(), detail::mpi_count(values.size()), detail::mpi_type<T>(), root, comm_),
                          "MPI_Bcast");
    }

    void barrier() { detail::check_mpi(MPI_Barrier(comm_), "MPI_Barrier"); }

private:
    void release() noexcept {
        if (comm_ == MPI_COMM_NULL) return;
        int finalised = 1;
        if (MPI_Finalized(&finalised) == MPI_SUCCESS && !finalised) MPI_Comm_free(&comm_);
        comm_ = MPI_COMM_NULL;
    }

    MPI_Comm comm_ = MPI_COMM_NULL;
    int rank_ = 0, size_ = 1;
};
static_assert(communicator<mpi_communicator>);
static_assert(communicates<mpi_communicator, double>);

}  // namespace dynamicid::training
